"""Files in and out: checkpoint formats (found from content), ``--arch`` factories, data
folders, the writers of every output format, and the options objects every command takes
(:class:`~bnctl.io.source.ModelSource`, :class:`~bnctl.io.source.CheckInputs`)."""
