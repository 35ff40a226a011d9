"""Fundus image sources (DRIVE on disk, procedurally drawn images) and the Lightning data module."""
