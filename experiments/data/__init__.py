"""What a run trains and is evaluated on: the dataset configs' loaders (data.datasets) and the generated data
(data.shapes, data.fractals)."""
