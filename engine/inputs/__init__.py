"""What an edit starts from: requests, tokens and subject positions, context templates, the statistics corpus."""
