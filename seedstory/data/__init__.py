"""Data: the synthetic story world (``seedstory.data.synthetic``)."""
