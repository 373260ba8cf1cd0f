// The playground script is written by the playground issue.
