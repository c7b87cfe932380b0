"""One module per `python -m training` command. Each has `add(commands, options)`, which
adds its parser (with `command=` the function that runs it), and that function.

A command that reads the dataset takes `(args, data)`; `needs_data=False` in its
parser's defaults marks the ones that take `(args)` alone (training/__main__.py loads
the dataset for the others, once, before running them).
"""
