"""What an exported file promises and how it is read, shared by training, the service,
the score job and the benchmark.

The ONNX file is the contract between training and serving: uint8 images in, its own
preprocessing, its model card (`modelcard`) and its proof of itself (`selfcheck`)
inside. Training writes these; everything that runs a file reads them here, through
one loader (`classifier`) on one engine interface (`engines`), and describes the
machine it ran on the same way (`hardware`), and check whose file it is against the
trusted keys where they are set (`trust`; `files` opens what a path names without
waiting on a FIFO or a device). Uploads become the uint8 images a file
takes through `images`, explanations are drawn by `occlusion`, and the Parquet files
the service and the score job write have their columns in `columns`.

Nothing here imports TensorFlow, the service or training.
"""
