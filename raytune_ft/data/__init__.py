"""The data pipeline: sources -> formats (validation, loss masks) -> tokens -> packing.

Modules: ``sources`` (read rows), ``formats`` (alpaca/chat/text, tokenization, generation prompts),
``tokenizer`` (train a BPE tokenizer), ``packing`` (packing and collators), ``pipeline``
(``build_datasets``), ``split`` (train/eval splits), ``preview`` (show the loss mask), ``quickstart``
(a dataset from the Python standard library). Nothing heavy is imported here.
"""
