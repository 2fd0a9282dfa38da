"""featurevis"""
