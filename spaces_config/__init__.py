"""What turns this repository into a Hugging Face Space: the README front matter, its body, and the builder
(`python -m spaces_config.build OUT_DIR [--push REPO_ID]`)."""
