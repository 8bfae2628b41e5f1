"""Tools for the operator, kept out of the `ops` package that users import: the benchmark of
every impl against softmax (tools.benchmark), the Triton kernels' tuning (tools.tune) and the
one-command GPU check (tools.gpu_check). Run from the repository root: `python -m tools.NAME`."""
