"""The data error type, importable without TensorFlow."""


class DataError(ValueError):
  """The data breaks the data contract (e.g. a label outside [0, num_classes)).

  main.py prints the message (which names the file, example or key) without a
  traceback.
  """
