"""What a run trains and is evaluated on: the dataset configs' loaders (data.datasets), the generated data
(data.shapes, data.fractals) and the batches the loop reads (data.loaders)."""
