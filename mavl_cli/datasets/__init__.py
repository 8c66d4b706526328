"""Data-set adapters: every label file and image layout users hold, read into one shape.

One module per data set owns its quirks: file detection, label vocabulary,
id and path rules, patient id, view column and uncertain-label convention.

* :mod:`~mavl_cli.datasets.chexpert` -- CheXpert ``train.csv``/``valid.csv``
* :mod:`~mavl_cli.datasets.nih` -- NIH ChestX-ray14 ``Data_Entry_2017.csv``
* :mod:`~mavl_cli.datasets.mimic` -- MIMIC-CXR(-JPG) label, metadata and split files
* :mod:`~mavl_cli.datasets.padchest` -- PadChest's label CSV (``Labels`` lists per film)
* :mod:`~mavl_cli.datasets.vindr` -- VinDr-CXR image-level label files
* :mod:`~mavl_cli.datasets.generic` -- any ``path,label1,label2,...`` CSV

Shared modules: :mod:`~.table` (:class:`LabelTable`), :mod:`~.sniff` (reading
CSVs, column names), :mod:`~.labelmap` (label names across data sets),
:mod:`~.ids` (path -> image id), :mod:`~.inputs` (what to embed), and
:mod:`~.reader` (:func:`~mavl_cli.datasets.reader.read_labels`, which picks the adapter),
:mod:`~.rows` (the rows an adapter returns) and :mod:`~.join` (labels joined to embeddings).
Import names from the module that defines them.
"""
