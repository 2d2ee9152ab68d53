"""The model families, one module each (`vit`, `swin`, `vit_pytorch`), their parts (`resnet`, `posemb`)
and the building blocks they share (`layers`)."""
