"""The application dependency map: :mod:`.depmap` builds it (from flows, or from policy when
there are none), :mod:`.render` writes it as DOT or as one self-contained interactive HTML file
(cytoscape.js + dagre, vendored in ``vendor/``)."""
