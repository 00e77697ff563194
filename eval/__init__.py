"""GenEval and T2I-CompBench scoring (arrives with the eval issue)."""
