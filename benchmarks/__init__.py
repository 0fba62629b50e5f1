"""Side-by-side benchmarks of kfp-grpo against TRL's GRPOTrainer.

`python -m benchmarks.run [--quick]` runs everything and writes
`benchmarks/results/<date>/results.md` plus PNG plots; see benchmarks/README.md.
"""
