"""The base every layer may import: errors a user can meet, the one typed settings module, and
the registry of number formats. It imports nothing else of nemocompile."""
