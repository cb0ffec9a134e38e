"""Edits that land in the user's module tree: copy-on-write editing (``edit``), deferred edits
grouped in units that stand or fall together (``units``), where a layer's new tensors live
(``slots``), and binding units to the result tree with their local checks (``bind``)."""
