"""Turn results into what people and scripts read: rich tables, JSON, CSV, Parquet, Markdown, PNG.

One module per result kind; functions return text or rich renderables (Parquet and plots are
written atomically to the file the user named). :mod:`.emit` holds the table of the formats
of every result kind and ``emit``, the one function that prints or writes a result.
"""
