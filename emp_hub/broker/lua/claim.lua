-- Claim jobs for a worker: claim_jobs (common.lua) with its arguments from ARGV[4].
return claim_jobs(4)
