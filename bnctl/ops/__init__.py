"""The operations: one module each, taking models and tensors, returning a result (and the
changed model where there is one). They write no file and print nothing.

The choices an operation offers are plain tuples here, importable without torch, so the CLI
derives its options from them.
"""

#: what ``bnctl convert --to`` converts BatchNorm layers to (:func:`bnctl.ops.convert.convert`)
CONVERT_TARGETS = ("syncbn", "batchnorm", "frozen", "groupnorm")
