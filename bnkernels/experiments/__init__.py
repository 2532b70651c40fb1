"""The research layer: experiments of "How Does Batch Normalization Help Optimization?"
(Santurkar et al., NeurIPS 2018) on bnkernels' normalization modules.

models       VGG-11/13/16/19 and the 25-layer deep linear network; ``make_norm`` picks the norm
data         CIFAR-10 (python pickles), scikit-learn's digits (offline default), DLN regression
train        run configs, the training loop, runs/<id>/ with metrics.jsonl and resume
ics          internal covariate shift (Definition 2.1)
landscape    loss / gradient-predictiveness / effective beta-smoothness probes
activations  activation distributions and step-to-step moment changes
plots        the paper's figures, drawn from saved runs only
report       the reproduce suite and report.md with the claims table
cli          the ``bnkernels`` command line
"""
