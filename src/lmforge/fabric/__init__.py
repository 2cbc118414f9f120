"""The Fabric glue: a plain training loop on Lightning Fabric."""
