"""Safe rooms for citizens: reports that reach moderators, flagged messages, and display
names that stay pseudonyms. `rules` and `texts` are pure; the rest does the I/O."""
