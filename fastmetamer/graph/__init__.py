"""Graph plumbing below both ``engines`` and ``metamers``: receptive-field subgraphs
(``subgraph``) and reading a model's layer output (``layers``)."""
