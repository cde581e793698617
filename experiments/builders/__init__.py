"""What a run trains: the model (builders.models), the method applied to it (builders.methods) and the two
put together with an optimizer (builders.variant); builders.factors rebuilds a linear as two factors;
builders.spectrum stands in for pretrained weights."""
