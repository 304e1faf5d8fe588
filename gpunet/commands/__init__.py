"""The work behind the ``gpunet`` commands that is more than printing: :mod:`gpunet.commands.train`
is ``gpunet train``'s run (data in; model, metrics and pictures out), callable from Python as
``train``. The command line itself (flags in, printing out) is :mod:`gpunet.cli`."""
