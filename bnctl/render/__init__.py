"""Turn results into what people and scripts read: rich tables, JSON, CSV, Parquet, Markdown, PNG.

One module per result kind. Functions return text or rich renderables (Parquet and plots are
written atomically to the file the user named); printing is the CLI's job.
"""

#: what ``bnctl inspect --format`` writes (:mod:`bnctl.render.inspect`)
INSPECT_FORMATS = ("table", "json", "csv", "parquet", "markdown")
#: what the commands that write a model print as their report
REPORT_FORMATS = ("table", "json")
