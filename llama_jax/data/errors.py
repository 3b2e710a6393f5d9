"""The one exception type of the data pipeline, so command-line tools can print it as one line."""


class DataError(ValueError):
  """Bad data configuration or input: a glob matching nothing, a bad weight, a malformed record
  under `on_bad_record='error'`, no documents at all."""
