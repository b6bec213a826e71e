"""The detect stage: merge partial windows per workload, run the detect engine; adapters for faust and in-process."""
