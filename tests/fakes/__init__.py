"""Fakes of the GPU stack for CPU tests: a CUDA runtime (streams, graphs, pools) and a tensorrt module.

Each keeps the documented rules of what it stands for and raises where one is broken, so that CPU tests
check the GPU code paths by construction (see tests/fakes/cuda.py and tests/fakes/tensorrt.py).
"""
