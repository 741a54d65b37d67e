"""From measurements to warnings: rules and the events they raise, forecasts of the onset, statistics, and each
training image's risk."""
