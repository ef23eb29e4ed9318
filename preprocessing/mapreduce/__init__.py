"""The Hadoop-streaming path: mapper.py | sort | reducer.py, then to_shards converts the output.

See ``docs/data_pipeline.md`` and the modules' docstrings for the commands.
"""
