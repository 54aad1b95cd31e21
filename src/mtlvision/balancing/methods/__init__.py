"""One module per balancing method (imported by `mtlvision.balancing`)."""
