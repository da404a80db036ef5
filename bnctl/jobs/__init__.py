"""The file jobs of the commands that write a model: a path in, the operation, an artifact
checked against the original, the path out (written atomically, never over the input).

One module per command; each takes a :class:`~bnctl.io.source.ModelSource` and, where the
result is verified, :class:`~bnctl.io.source.CheckInputs`.
"""

#: where ``bnctl recalibrate`` runs its forward passes
DEVICES = ("cpu", "cuda")
#: how ``bnctl convert`` saves the converted model: the pickled module, or its state_dict
SAVE_AS = ("module", "state-dict")
