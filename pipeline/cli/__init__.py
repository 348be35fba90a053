"""Console scripts: thin wrappers that parse options and call the package."""
