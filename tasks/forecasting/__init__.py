"""Forecasting: AR-Net and backbone forecasters on Time-Series-Library data."""
