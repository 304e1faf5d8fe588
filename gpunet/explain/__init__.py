"""explain: one training step recorded in the course notes' notation, and drawn.

- :mod:`gpunet.explain.record`: ``explain_step`` runs one step through the training objects and
  records every quantity (host copies); ``to_json`` writes the record (schema ``gpunet-explain/2``).
- :mod:`gpunet.explain.render`: the record as plain text, markdown with LaTeX, or JSON text.
- :mod:`gpunet.explain.build`: a network and a target from plain lists (the command line,
  notebooks), and the default 2-2-2 example.
"""

from .record import SCHEMA, explain_step, to_json
from .render import render_json, render_markdown, render_text

__all__ = ["SCHEMA", "explain_step", "to_json", "render_json", "render_markdown", "render_text"]
