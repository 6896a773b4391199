"""HTTP routes, one module per front end."""
