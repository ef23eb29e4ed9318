"""Data producers: the synthetic census generator, the Spark job, the Hadoop-streaming path."""
