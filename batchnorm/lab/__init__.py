"""The lab: train small networks with and without Batch Normalization on real data.

``data`` loads the data sets, ``models`` builds the networks, ``experiments``
runs them, ``plots`` and ``report`` write the results.
"""
