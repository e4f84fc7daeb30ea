"""Speed benchmarks: DSA layer stacks under IndexCache patterns, and kernels."""
