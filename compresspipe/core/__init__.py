"""The bottom layer: the artifact and its typed keys, model building, data, the one training
loop, measuring, distributed helpers and errors. Imports nothing else of compresspipe."""
