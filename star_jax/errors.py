"""Errors caused by the user's input. The CLI prints them as one line and exits with code 2."""


class UserError(ValueError):
  """Bad input, config or file: the message names the thing and says how to fix it."""
