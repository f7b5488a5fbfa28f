"""Reusable widgets that views build on (no view imports another view; they share these).

* :mod:`.result_table`: a sortable, filterable table of result rows.
* :mod:`.eliding_combo`: a combo box eliding long names in the middle.
* :mod:`.layer_picker`: a checkable list of layers grouped by block, with a filter and shapes.
"""
