-- Go past the current pause (kubectl sluice promote).
return request("promote")
