"""The research layer: experiments of "How Does Batch Normalization Help Optimization?"
(Santurkar et al., NeurIPS 2018) on bnkernels' normalization modules.

models       VGG-11/13/16/19 and the 25-layer deep linear network; ``make_norm`` picks the norm
data         CIFAR-10 (python pickles), scikit-learn's digits (offline default), DLN regression
train        run configs, the training loop, runs/<id>/ with metrics.jsonl and resume
runfiles     atomic writes, checkpoints read without running code (weights_only), folder locks
stopping     SIGINT/SIGTERM stop runs and worker processes, folders left at a checkpoint
ics          internal covariate shift (Definition 2.1)
landscape    loss / gradient-predictiveness / effective beta-smoothness probes; both ends of
             the Hessian's spectrum (Lanczos on Hessian-vector products) and trace (Hutchinson)
activations  activation distributions and step-to-step moment changes
noisy        test accuracy of noisy-BatchNorm networks: eval mode vs consistent evaluations
plots        the paper's figures, drawn from saved runs only (median and range over seeds)
report       the reproduce suites (quick, gpu, full) over seeds and report.md with the claims
             table
(the ``bnkernels`` command line is :mod:`bnkernels.cli`)
"""
