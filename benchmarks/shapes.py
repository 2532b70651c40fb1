"""The benchmark shapes, as data: VGG-16 and ResNet-50 normalization inputs (CIFAR 32x32 at
batch 128; ImageNet 224x224 at batch 64 and 256), edge cases, dtypes, layouts and the named
suites. The data lives in the package, :mod:`bnkernels.benchmarking.shapes`, so that the
installed ``bnkernels bench`` runner and this pytest-benchmark suite read the same table; this
module re-exports it. ``python benchmarks/shapes.py`` prints every shape and the layers it
stands for.
"""

from bnkernels.benchmarking.shapes import *  # noqa: F403
from bnkernels.benchmarking.shapes import shape_groups, suites

if __name__ == "__main__":
    for group, shapes in shape_groups().items():
        print(group)
        for s in shapes:
            print(f"  {s.name:<20} {s.count:>2} layer(s): {', '.join(s.sources)}")
    for name, suite in suites().items():
        print(f"suite {name}: {len(suite.shapes)} shapes x {suite.dtypes} x {suite.layouts}: "
              f"{suite.description}")
