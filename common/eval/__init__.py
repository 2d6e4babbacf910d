"""Model evaluation: perplexity, lm-eval-harness-format tasks, sandboxed code execution for pass@k."""
