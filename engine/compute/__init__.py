"""What the solve needs: target vectors z (the z loop), keys, and covariance statistics."""
