"""deployctl, the operator's command line: argument parsing, the channel to the controller and
the rendering of answers. It imports only `protos` and `common`."""
