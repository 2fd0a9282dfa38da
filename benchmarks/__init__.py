"""Benchmarks of the stages against the published algorithm (bench_stageN.py, run_all.py; their workload in
workload.py, their measurement in measure.py), the GPU suite (gpu_suite.sh, gpu_steps.py) and other timings;
studies/ holds one-off studies (numerical effects of bf16, TF32 and --fast_resize, CPU decoding, stage 2's
memory, the ResNet layout). Run them as modules from the repository root: ``python -m benchmarks.run_all``."""
