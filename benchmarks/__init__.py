"""fedhog's benchmark suite: ``python -m benchmarks`` (see :mod:`benchmarks.suite`).

Where things are:

- :mod:`benchmarks.catalog`: what the benchmarks are (scales, titles, kinds, targets, smoke-run methods); imports
  nothing else of the suite, so anything may import it.
- :mod:`benchmarks.suite`: the throughput benchmarks (P1-P3, P5, P6) and the runner; :mod:`benchmarks.accuracy`
  (P4, P7-P9, P13), :mod:`benchmarks.lpp` (P12) and :mod:`benchmarks.defaults` (P10): the time-to-accuracy ones.
- :mod:`benchmarks.harness`: launching runs and turning step times into figures; ``throughput.py`` is the program
  a throughput launch runs, :mod:`benchmarks.ranks` starts a launch's ranks inside a thin-link namespace, and
  :mod:`benchmarks.straggler` has the recipe callbacks of the straggler benchmarks.
- :mod:`benchmarks.report`: results -> PNGs and the README's results section (no torch, no Lightning).
- ``consensus.py``, ``partial_backprop.py``, ``idle_share.py``: stand-alone measurements; ``gpu_check.sh``: the
  GPU tests and P5 on a GPU machine.

The smoke mode (``--smoke``, the test suite's) forks its ranks from the tests' zygote (``tests/zygote.py``).
"""
