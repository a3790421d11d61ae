"""Tools of this repository that are not part of the installed package: the Triton AOT compile and its SASS
analysis (``triton_aot``, ``sass``), the interpreter instrumentation (``triton_instrument``) and the GPU
traffic, occupancy and time model (``gpu_model``). Run from a checkout (the tests, ``benchmarks/`` and
``python -m tools.<module>`` put the repository root on the path)."""
